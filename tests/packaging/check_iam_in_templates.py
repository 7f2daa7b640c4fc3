"""The IAM statements embedded in the CloudFormation templates are those of
packaging/iam (same Sids, same actions). Uses cfn-lint's template decoder
(it reads the !Ref/!GetAtt tags). Prints "N passed, M failed"."""
import json
import sys

from cfnlint.decode import decode

ROOT = sys.argv[1] if len(sys.argv) > 1 else "."


def actions(stmt):
    a = stmt["Action"]
    return sorted([a] if isinstance(a, str) else a)


def template_statements(path, role):
    tpl, errors = decode(f"{ROOT}/{path}")
    if errors:
        raise SystemExit(f"{path}: {errors}")
    policies = tpl["Resources"][role]["Properties"]["Policies"]
    return {s["Sid"]: actions(s) for p in policies for s in p["PolicyDocument"]["Statement"]}


def json_statements(path, skip=()):
    with open(f"{ROOT}/{path}") as f:
        doc = json.load(f)
    return {s["Sid"]: actions(s) for s in doc["Statement"] if s["Sid"] not in skip}


passed = failed = 0
cases = [
    ("agent", "packaging/cloudformation/spotguard-region.yaml", "InstanceRole", "packaging/iam/agent-policy.json", ()),
    # Lambda gets its events from EventBridge, not from the events queue.
    ("controller", "packaging/cloudformation/spotguard-control.yaml", "ControllerRole",
     "packaging/iam/controller-policy.json", ("EventsQueue",)),
]
for name, tpl, role, policy, skip in cases:
    got, want = template_statements(tpl, role), json_statements(policy, skip)
    if got == want:
        passed += 1
        print(f"ok   {name}: {tpl} {role} matches {policy}")
    else:
        failed += 1
        print(f"FAIL {name}: {tpl} {role}\n  template: {got}\n  policy:   {want}")
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
