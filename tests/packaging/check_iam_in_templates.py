"""The IAM statements embedded in the CloudFormation templates are those of
packaging/iam, whole statements compared (Sid, Effect, Action, Resource,
Condition), with the templates' intrinsic functions rendered and their
placeholders mapped onto the JSON's (${GroupArn}, ${QueueArn}, ...); and
both forms hold the least-privilege properties of README "Threat model":

- no autoscaling write (anything but Describe*/Get*) is allowed on "*";
- the agent's writes name exactly its own group's ARN;
- every autoscaling write keeps the spotguard=true tag as a second guard;
- the controller writes only its configured groups, changes only MaxSize
  and DesiredCapacity (within GroupMaxSizeLimit), and tags only spotguard:*
  keys (so never the key spotguard itself).

Then a self-test: each check must fail on a policy that lacks what it checks
(the old Resource "*" statements, a dropped condition, a template that
differs from its JSON in a condition or a resource only).

Uses cfn-lint's template decoder (it reads the !Ref/!Sub/!If tags).
Usage: check_iam_in_templates.py [ROOT]. Prints "N passed, M failed"."""
import copy
import json
import re
import sys

from cfnlint.decode import decode

ROOT = sys.argv[1] if len(sys.argv) > 1 else "."

GROUP_ARN = "arn:${AWS::Partition}:autoscaling:%s:${AWS::AccountId}:autoScalingGroup:*:autoScalingGroupName/%s"
# Template rendering -> the JSON's placeholder (README, "Least privilege").
AGENT_SUBST = {
    GROUP_ARN % ("${AWS::Region}", "${GroupName}"): "${GroupArn}",
    "arn:${AWS::Partition}:ec2:${AWS::Region}:${AWS::AccountId}:instance/*": "${InstanceArns}",
}
CONTROLLER_SUBST = {
    "${JobQueue.Arn}": "${QueueArn}",
    "${LeaseQueue.Arn}": "${LeaseQueueArn}",
    "${NoticesTopic}": "${TopicArn}",
    GROUP_ARN % ("${AWS::Region}", "${PrimaryGroupName}"): "${PrimaryGroupArn}",
    "${If Cascade ? %s : %s}" % (GROUP_ARN % ("*", "${CascadeGroupNamePattern}"),
                                  GROUP_ARN % ("${FallbackRegion}", "${FallbackGroupName}")): "${FallbackGroupArn}",
}
CASES = [
    # name, template, role, policy JSON, Sids only in the JSON, substitutions
    ("agent", "packaging/cloudformation/spotguard-region.yaml", "InstanceRole",
     "packaging/iam/agent-policy.json", (), AGENT_SUBST),
    # Lambda gets its events from EventBridge, not from the events queue.
    ("controller", "packaging/cloudformation/spotguard-control.yaml", "ControllerRole",
     "packaging/iam/controller-policy.json", ("EventsQueue",), CONTROLLER_SUBST),
]
AGENT_WRITES = {
    "autoscaling:TerminateInstanceInAutoScalingGroup", "autoscaling:SetInstanceHealth",
    "autoscaling:SetInstanceProtection", "autoscaling:RecordLifecycleActionHeartbeat",
    "autoscaling:CompleteLifecycleAction",
}
CONTROLLER_GROUPS = {"${PrimaryGroupArn}", "${FallbackGroupArn}"}
# Request keys UpdateAutoScalingGroup must not carry: the controller sets
# MaxSize and DesiredCapacity only (controller/src/aws.rs update_group).
UPDATE_MUST_LACK = ["autoscaling:MinSize", "autoscaling:LaunchConfigurationName",
                    "autoscaling:LaunchTemplateVersionSpecified", "autoscaling:InstanceTypes",
                    "autoscaling:VPCZoneIdentifiers"]


def render(node):
    """Plain data, with !Ref X as ${X}, !GetAtt R.A as ${R.A}, !Sub as its
    text and !If [c, a, b] as ${If c ? a : b}."""
    if isinstance(node, dict):
        if len(node) == 1:
            (k, v), = node.items()
            if k == "Ref":
                return "${%s}" % v
            if k == "Fn::GetAtt":
                return "${%s}" % (".".join(v) if isinstance(v, list) else v)
            if k == "Fn::Sub":
                if isinstance(v, list):
                    text, env = str(v[0]), {n: render(x) for n, x in v[1].items()}
                    return re.sub(r"\$\{([^}!]+)\}", lambda m: str(env.get(m.group(1), m.group(0))), text)
                return str(v)
            if k == "Fn::If":
                return "${If %s ? %s : %s}" % (v[0], render(v[1]), render(v[2]))
        return {str(k): render(v) for k, v in node.items()}
    if isinstance(node, list):
        return [render(x) for x in node]
    return node if isinstance(node, (bool, int, float)) else str(node)


def as_list(x):
    return list(x) if isinstance(x, list) else [x]


def canon(stmt, subst):
    """One statement, order-free: lists sorted, scalars as one-item lists,
    template renderings replaced by the JSON's placeholders."""
    sub = lambda v: subst.get(str(v), str(v))  # noqa: E731
    out = {k: v for k, v in stmt.items() if k not in ("Action", "Resource", "Condition")}
    out["Action"] = sorted(as_list(stmt.get("Action", [])))
    out["Resource"] = sorted(sub(r) for r in as_list(stmt.get("Resource", [])))
    out["Condition"] = {op: {key: sorted(sub(x) for x in as_list(val)) for key, val in kv.items()}
                        for op, kv in stmt.get("Condition", {}).items()}
    return out


def load():
    """{name: (template statements, JSON statements)}, as plain data."""
    docs = {}
    for name, tpl_path, role, policy, _, _ in CASES:
        tpl, errors = decode(f"{ROOT}/{tpl_path}")
        if errors:
            raise SystemExit(f"{tpl_path}: {errors}")
        policies = tpl["Resources"][role]["Properties"]["Policies"]
        tpl_stmts = [render(s) for p in policies for s in p["PolicyDocument"]["Statement"]]
        with open(f"{ROOT}/{policy}") as f:
            json_stmts = json.load(f)["Statement"]
        docs[name] = (tpl_stmts, json_stmts)
    return docs


def is_write(action):
    service, _, op = action.partition(":")
    return service == "autoscaling" and not op.startswith(("Describe", "Get"))


def writes(stmts):
    return [s for s in stmts if s["Effect"] == "Allow" and any(is_write(a) for a in s["Action"])]


def checks(docs):
    """[(check name, ok, detail)] over both forms of both policies."""
    out = []
    canonical = {}
    for name, tpl_path, role, policy, skip, subst in CASES:
        tpl_stmts, json_stmts = docs[name]
        got = {s.get("Sid"): canon(s, subst) for s in tpl_stmts}
        want = {s.get("Sid"): canon(s, {}) for s in json_stmts if s.get("Sid") not in skip}
        diff = {sid: {"template": got.get(sid), "policy": want.get(sid)}
                for sid in sorted(set(got) | set(want), key=str) if got.get(sid) != want.get(sid)}
        out.append((f"{name}: {tpl_path} {role} has the statements of {policy} (whole statements)",
                     not diff, json.dumps(diff, indent=1)))
        canonical[name] = {"template": list(got.values()), "JSON": list(want.values())}

    for name, forms in canonical.items():
        for form, stmts in forms.items():
            bad = [s.get("Sid") for s in writes(stmts) if "*" in s["Resource"]]
            out.append((f"{name} ({form}): no autoscaling write is allowed on Resource \"*\"", not bad, bad))
            bad = [s.get("Sid") for s in writes(stmts)
                   if s["Condition"].get("StringEquals", {}).get("autoscaling:ResourceTag/spotguard") != ["true"]]
            out.append((f"{name} ({form}): every autoscaling write keeps the spotguard=true tag guard", not bad, bad))
            tagging = [s for s in stmts if s["Effect"] == "Allow"
                       and {"autoscaling:CreateOrUpdateTags", "autoscaling:DeleteTags"} & set(s["Action"])]
            bad = [s.get("Sid") for s in tagging
                   if s["Condition"].get("ForAllValues:StringLike", {}).get("aws:TagKeys") != ["spotguard:*"]
                   or s["Condition"].get("Null", {}).get("aws:TagKeys") != ["false"]]
            out.append((f"{name} ({form}): tags only spotguard:* keys (ForAllValues:StringLike aws:TagKeys, "
                        "and the key present)", not bad, bad))

        for form, stmts in forms.items():
            if name == "agent":
                mine = [s for s in writes(stmts) if AGENT_WRITES & set(s["Action"])]
                held = set().union(*(set(s["Action"]) for s in mine)) if mine else set()
                ok = bool(mine) and held >= AGENT_WRITES and all(s["Resource"] == ["${GroupArn}"] for s in mine)
                out.append((f"agent ({form}): its writes name exactly its own group's ARN (${{GroupArn}})",
                            ok, [(s.get("Sid"), s["Resource"]) for s in mine]))
            else:
                bad = [(s.get("Sid"), s["Resource"]) for s in writes(stmts)
                       if not set(s["Resource"]) <= CONTROLLER_GROUPS]
                out.append((f"controller ({form}): writes only its configured groups' ARNs", not bad, bad))
                updates = [s for s in stmts if "autoscaling:UpdateAutoScalingGroup" in s["Action"]]
                bad = [s.get("Sid") for s in updates
                       if any(s["Condition"].get("Null", {}).get(k) != ["true"] for k in UPDATE_MUST_LACK)
                       or s["Condition"].get("NumericLessThanEqualsIfExists", {}).get("autoscaling:MaxSize")
                       != ["${GroupMaxSizeLimit}"]]
                out.append((f"controller ({form}): UpdateAutoScalingGroup changes MaxSize (capped) and "
                            "DesiredCapacity only", bool(updates) and not bad, bad))
    return out


def statement(stmts, sid):
    return next(s for s in stmts if s.get("Sid") == sid)


def self_tests(docs):
    """Each mutation must make the named checks fail (and only be caught
    by them: the point is that each check has teeth)."""
    def old_agent(d):  # the agent's writes as they were: Resource "*", both forms
        for stmts in d["agent"]:
            statement(stmts, "InstancesOfItsOwnGroupOnly")["Resource"] = "*"

    def old_controller(d):  # one statement on "*", no TagKeys condition, both forms
        for stmts in d["controller"]:
            s = statement(stmts, "SpotguardColonTagsOfItsGroupsOnly")
            s["Resource"] = "*"
            del s["Condition"]["ForAllValues:StringLike"]

    def tag_key_may_be_absent(d):
        for stmts in d["controller"]:
            del statement(stmts, "SpotguardColonTagsOfItsGroupsOnly")["Condition"]["Null"]

    def no_tag_guard(d):
        for stmts in d["agent"]:
            del statement(stmts, "InstancesOfItsOwnGroupOnly")["Condition"]

    def min_size_allowed(d):
        for stmts in d["controller"]:
            del statement(stmts, "CapacityOfItsGroupsOnly")["Condition"]["Null"]["autoscaling:MinSize"]

    def another_group(d):
        for stmts in d["agent"]:
            statement(stmts, "InstancesOfItsOwnGroupOnly")["Resource"] = "${SomeOtherGroupArn}"

    def template_condition_differs(d):  # same actions and resource; one condition value
        tpl = statement(d["agent"][0], "InstancesOfItsOwnGroupOnly")
        tpl["Condition"]["StringEquals"]["autoscaling:ResourceTag/spotguard"] = "yes"

    def template_resource_differs(d):  # same actions and conditions; the fallback only
        tpl = statement(d["controller"][0], "ProtectionOfItsGroupsOnly")
        tpl["Resource"] = [GROUP_ARN % ("${AWS::Region}", "${PrimaryGroupName}")]

    def json_condition_missing(d):
        del statement(d["controller"][1], "CapacityOfItsGroupsOnly")["Condition"]["NumericLessThanEqualsIfExists"]

    mutations = [
        ("the agent's old Resource \"*\"", old_agent,
         ["agent (template): no autoscaling write is allowed on Resource \"*\"",
          "agent (JSON): no autoscaling write is allowed on Resource \"*\"",
          "agent (template): its writes name exactly its own group's ARN (${GroupArn})",
          "agent (JSON): its writes name exactly its own group's ARN (${GroupArn})"]),
        ("the controller's old Resource \"*\" without a TagKeys condition", old_controller,
         ["controller (template): no autoscaling write is allowed on Resource \"*\"",
          "controller (JSON): tags only spotguard:* keys (ForAllValues:StringLike aws:TagKeys, and the key present)",
          "controller (template): writes only its configured groups' ARNs"]),
        ("ForAllValues without the key required (true on a request without tags)", tag_key_may_be_absent,
         ["controller (JSON): tags only spotguard:* keys (ForAllValues:StringLike aws:TagKeys, and the key present)"]),
        ("the spotguard=true guard dropped", no_tag_guard,
         ["agent (template): every autoscaling write keeps the spotguard=true tag guard"]),
        ("UpdateAutoScalingGroup may set MinSize", min_size_allowed,
         ["controller (template): UpdateAutoScalingGroup changes MaxSize (capped) and DesiredCapacity only"]),
        ("the agent's writes on another group", another_group,
         ["agent (JSON): its writes name exactly its own group's ARN (${GroupArn})"]),
        ("a template condition value differing from the JSON", template_condition_differs,
         ["agent: packaging/cloudformation/spotguard-region.yaml InstanceRole has the statements of "
          "packaging/iam/agent-policy.json (whole statements)"]),
        ("a template resource differing from the JSON", template_resource_differs,
         ["controller: packaging/cloudformation/spotguard-control.yaml ControllerRole has the statements of "
          "packaging/iam/controller-policy.json (whole statements)"]),
        ("a JSON condition missing from one statement", json_condition_missing,
         ["controller: packaging/cloudformation/spotguard-control.yaml ControllerRole has the statements of "
          "packaging/iam/controller-policy.json (whole statements)",
          "controller (JSON): UpdateAutoScalingGroup changes MaxSize (capped) and DesiredCapacity only"]),
    ]
    out = []
    for what, mutate, must_fail in mutations:
        d = copy.deepcopy(docs)
        try:
            mutate(d)
        except (StopIteration, KeyError) as e:
            out.append((f"self-test: {what}", False, f"the statement or key it mutates is missing: {e!r}"))
            continue
        results = {n: ok for n, ok, _ in checks(d)}
        unknown = [n for n in must_fail if n not in results]
        still_ok = [n for n in must_fail if results.get(n)]
        out.append((f"self-test: {what} fails {len(must_fail)} check(s)", not unknown and not still_ok,
                    f"passed anyway: {still_ok}; no such check: {unknown}"))
    return out


docs = load()
passed = failed = 0
for name, ok, detail in checks(docs) + self_tests(docs):
    if ok:
        passed += 1
        print(f"ok   {name}")
    else:
        failed += 1
        print(f"FAIL {name}\n  {detail}")
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
