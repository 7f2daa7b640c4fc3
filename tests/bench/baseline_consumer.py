"""Baseline for the agent CPU benchmark: the simplest boto3 SQS consumer that
runs a command per message and deletes it (the shape of hand-rolled worker
loops). Usage: baseline_consumer.py ENDPOINT QUEUE_URL COUNT COMMAND...
Exits after COUNT messages were processed."""
import subprocess
import sys

import boto3

endpoint, queue_url, count, command = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1",
                   aws_access_key_id="test", aws_secret_access_key="test")
done = 0
while done < count:
    out = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
    for m in out.get("Messages", []):
        subprocess.run(command, input=m["Body"].encode(), check=False)
        sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=m["ReceiptHandle"])
        done += 1
