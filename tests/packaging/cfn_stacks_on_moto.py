"""Creates the CloudFormation stacks on moto (the control plane in
us-east-1, a fleet in us-east-1, one in us-east-2 and an on-demand one in
us-west-2: a three-group cascade; then a control plane configured for that
cascade) and checks the resources. Usage: cfn_stacks_on_moto.py MOTO_SERVER LAMBDA_ZIP.
Prints "N passed, M failed"."""
import base64
import socket
import subprocess
import sys
import time

import boto3

moto_bin, lambda_zip = sys.argv[1], sys.argv[2]
PACKAGE_SHA256 = "0123456789abcdef" * 4
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
proc = subprocess.Popen([moto_bin, "-H", "127.0.0.1", "-p", str(port)],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
passed = failed = 0


def check(what, ok, detail=""):
    global passed, failed
    if ok:
        passed += 1
        print(f"ok   {what}")
    else:
        failed += 1
        print(f"FAIL {what} {detail}")


def client(service, region="us-east-1"):
    return boto3.client(service, endpoint_url=f"http://127.0.0.1:{port}", region_name=region,
                        aws_access_key_id="test", aws_secret_access_key="test")


def create(region, name, template, params):
    cfn = client("cloudformation", region)
    cfn.create_stack(StackName=name, TemplateBody=open(template).read(), Capabilities=["CAPABILITY_IAM"],
                     Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in params.items()])
    for _ in range(60):
        st = cfn.describe_stacks(StackName=name)["Stacks"][0]
        if not st["StackStatus"].endswith("IN_PROGRESS"):
            break
        time.sleep(0.5)
    check(f"{name} in {region}: {st['StackStatus']}", st["StackStatus"] == "CREATE_COMPLETE", st.get("StackStatusReason"))
    return {o["OutputKey"]: o["OutputValue"] for o in st.get("Outputs", [])}


try:
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            break
        except OSError:
            time.sleep(0.1)
    client("s3").create_bucket(Bucket="code")
    client("s3").put_object(Bucket="code", Key="spotguard/spotguard-controller-lambda.zip", Body=open(lambda_zip, "rb").read())
    out = create("us-east-1", "spotguard-control", "packaging/cloudformation/spotguard-control.yaml",
                 {"ControllerCodeBucket": "code", "FallbackMaxSize": "7"})
    sqs = client("sqs")
    attrs = sqs.get_queue_attributes(QueueUrl=out["QueueUrl"], AttributeNames=["All"])["Attributes"]
    import json as _json
    redrive = _json.loads(attrs.get("RedrivePolicy", "{}"))
    # Parsed: a substring test of "maxReceiveCount": 5 also matches 50.
    check("job queue redrives to the DLQ after 5 receives",
          int(redrive.get("maxReceiveCount", 0)) == 5 and redrive.get("deadLetterTargetArn", "").endswith(":" + out["DeadLetterQueueUrl"].rsplit("/", 1)[1]),
          attrs.get("RedrivePolicy"))
    fn = client("lambda").get_function(FunctionName=out["ControllerFunction"])["Configuration"]
    env = fn["Environment"]["Variables"]
    check("controller runs provided.al2023 bootstrap", fn["Runtime"] == "provided.al2023" and fn["Handler"] == "bootstrap")
    check("controller config in SPOTGUARD_* variables",
          env.get("SPOTGUARD_PRIMARY_QUEUE_URL") == out["QueueUrl"] and str(env.get("SPOTGUARD_FALLBACK_MAX_SIZE")) == "7"
          and env.get("SPOTGUARD_NOTIFY_SNS_TOPIC_ARN") == out["TopicArn"], env)
    check("no periodic tasks unless given (no SPOTGUARD_CRON_YAML)", "SPOTGUARD_CRON_YAML" not in env, env)
    rules = client("events").list_rules()["Rules"]
    check("three EventBridge rules (capacity failures, successes, schedule)", len(rules) == 3, rules)
    check("no rule for spot interruption warnings (every one in the region would invoke the controller)",
          not any("Interruption Warning" in (r.get("EventPattern") or "") for r in rules), rules)
    check("a one-minute schedule", any(r.get("ScheduleExpression") == "rate(1 minute)" for r in rules))
    # moto (5.x) does not create AWS::CloudWatch::Alarm or
    # AWS::AutoScaling::ScalingPolicy from a template (it lists them with an
    # empty logical id): their properties are checked in the template as
    # CloudFormation reads it (cfn-lint's decoder; cfn-lint checks the
    # schema), and in CloudWatch should a later moto create them.
    import cfnlint.decode
    control, _ = cfnlint.decode.decode("packaging/cloudformation/spotguard-control.yaml")
    alarm_ids = [k for k, v in control["Resources"].items() if v["Type"] == "AWS::CloudWatch::Alarm"]
    metrics = sorted(control["Resources"][k]["Properties"]["MetricName"] for k in alarm_ids)
    check("four alarms (backlog metric missing, failed over too long, DLQ not empty, controller errors)",
          metrics == ["ApproximateNumberOfMessagesVisible", "BacklogPerInstance", "Errors", "FailedOver"], metrics)
    check("the alarms notify the topic",
          all(control["Resources"][k]["Properties"]["AlarmActions"] == [{"Ref": "NoticesTopic"}] for k in alarm_ids))
    missing = control["Resources"]["BacklogMetricMissingAlarm"]["Properties"]
    check("a missing backlog metric is breaching, after 10 one-minute periods",
          missing["TreatMissingData"] == "breaching" and missing["Period"] == 60 and missing["EvaluationPeriods"] == 10, missing)
    live = client("cloudwatch").describe_alarms()["MetricAlarms"]
    if live:
        check("the alarms exist in CloudWatch", len(live) == 4, live)
    check("no reserved concurrency (it cannot deploy under a low account quota; the lease serialises)",
          client("lambda").get_function_concurrency(FunctionName=out["ControllerFunction"]).get("ReservedConcurrentExecutions") is None)
    # The dashboard: moto (5.x) may not create AWS::CloudWatch::Dashboard
    # from a template; its body is checked against what the controller
    # publishes by a unit test (controller/src/metrics.rs), and here, where
    # moto has it, as CloudWatch stores it.
    import json as _json
    boards = client("cloudwatch").list_dashboards().get("DashboardEntries", [])
    if boards:
        body = _json.loads(client("cloudwatch").get_dashboard(DashboardName=out["DashboardName"])["DashboardBody"])
        check("the fleet dashboard: ten widgets, the job queue's name filled in",
              len(body["widgets"]) == 10 and out["QueueUrl"].rsplit("/", 1)[1] in _json.dumps(body), body)
    else:
        print("note: moto created no dashboard (AWS::CloudWatch::Dashboard not modelled); the unit test checks its body")
    lease = sqs.get_queue_attributes(QueueUrl=out["LeaseQueueUrl"], AttributeNames=["All"])["Attributes"]
    check("the lease queue is FIFO, keeps its token 14 days, and the controller is given it",
          lease.get("FifoQueue") == "true" and lease.get("MessageRetentionPeriod") == "1209600"
          and env.get("SPOTGUARD_LEASE_QUEUE_URL") == out["LeaseQueueUrl"], (lease, env))

    for region, group, max_size, purchase in [("us-east-1", "spotguard-gpu-primary", "10", "spot"),
                                              ("us-east-2", "spotguard-gpu-fallback", "0", "spot"),
                                              ("us-west-2", "spotguard-gpu-west", "0", "on-demand")]:
        ec2 = client("ec2", region)
        vpc = ec2.create_vpc(CidrBlock="10.0.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock="10.0.1.0/24", AvailabilityZone=f"{region}a")["Subnet"]["SubnetId"]
        ami = ec2.describe_images()["Images"][0]["ImageId"]
        create(region, group, "packaging/cloudformation/spotguard-region.yaml", {
            "GroupName": group, "MaxSize": max_size, "QueueUrl": out["QueueUrl"], "QueueArn": out["QueueArn"],
            "TopicArn": out["TopicArn"], "ImageId": ami, "Subnets": subnet,
            "AgentPackageUrl": "https://example.invalid/spotguard-agent.rpm", "AgentPackageSha256": PACKAGE_SHA256,
            "Purchase": purchase,
        })
        fleet, _ = cfnlint.decode.decode("packaging/cloudformation/spotguard-region.yaml")
        pol = fleet["Resources"]["BacklogPolicy"]["Properties"]
        ttc = pol["TargetTrackingConfiguration"]
        spec = ttc["CustomizedMetricSpecification"]
        check(f"{group}: the template's target-tracking policy tracks BacklogPerInstance of its group (no setup needed)",
              pol["PolicyType"] == "TargetTrackingScaling" and pol["AutoScalingGroupName"] == {"Ref": "Group"}
              and ttc["TargetValue"] == {"Ref": "BacklogTarget"} and spec["MetricName"] == "BacklogPerInstance"
              and spec["Dimensions"] == [{"Name": "AutoScalingGroupName", "Value": {"Ref": "GroupName"}}], pol)
        g = client("autoscaling", region).describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"]
        check(f"{group}: exists", len(g) == 1)
        if g:
            g = g[0]
            check(f"{group}: MinSize 0, MaxSize {max_size}", g["MinSize"] == 0 and str(g["MaxSize"]) == max_size)
            check(f"{group}: tagged spotguard=true",
                  any(t["Key"] == "spotguard" and t["Value"] == "true" for t in g.get("Tags", [])), g.get("Tags"))
            dist = g.get("MixedInstancesPolicy", {}).get("InstancesDistribution", {})
            want = 100 if purchase == "on-demand" else 0
            check(f"{group}: {purchase} (OnDemandPercentageAboveBaseCapacity {want})",
                  dist.get("OnDemandPercentageAboveBaseCapacity") == want, dist)
        lts = ec2.describe_launch_templates()["LaunchTemplates"]
        data = ec2.describe_launch_template_versions(LaunchTemplateId=lts[0]["LaunchTemplateId"])["LaunchTemplateVersions"][0]["LaunchTemplateData"]
        user_data = base64.b64decode(data.get("UserData", "")).decode()
        check(f"{group}: user-data writes the queue URL and enables the agent",
              out["QueueUrl"] in user_data and "systemctl enable --now spotguard-agent" in user_data)
        check(f"{group}: IMDSv2 required", data.get("MetadataOptions", {}).get("HttpTokens") == "required")
        check_sum, installs = user_data.find(f"echo \"{PACKAGE_SHA256}  $pkg\" | sha256sum -c -"), \
            [user_data.find(s) for s in ('dnf install -y "$pkg"', 'dpkg -i --force-confold "$pkg"')]
        check(f"{group}: user-data checks the package's SHA-256 before installing it",
              check_sum > 0 and all(i > check_sum for i in installs), user_data)
    cascade = '[{ region = "us-east-2", asg = "spotguard-gpu-fallback" }, { region = "us-west-2", asg = "spotguard-gpu-west", max_size = 4 }]'
    cron = 'version: 1\ncron:\n - name: "cleanup"\n   url: "/periodic/"\n   schedule: "0 3 * * *"\n'
    out = create("us-east-1", "spotguard-control-cascade", "packaging/cloudformation/spotguard-control.yaml",
                 {"ControllerCodeBucket": "code", "Fallbacks": cascade, "CronYaml": cron,
                  "CascadeGroupNamePattern": "spotguard-gpu-*"})
    fns = [f for f in client("lambda").list_functions()["Functions"] if f["FunctionName"] == out.get("ControllerFunction")]
    env = fns[0]["Environment"]["Variables"] if fns else {}
    check("a cascade's control plane passes SPOTGUARD_FALLBACKS and not the one-group variables",
          env.get("SPOTGUARD_FALLBACKS") == cascade and "SPOTGUARD_FALLBACK_ASG" not in env, env)
    check("the control plane passes cron.yaml as SPOTGUARD_CRON_YAML", env.get("SPOTGUARD_CRON_YAML") == cron, env)
finally:
    proc.terminate()
print(f"{passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
