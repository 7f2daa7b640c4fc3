#!/usr/bin/env bash
# The original design's interruption check, kept as the benchmark baseline:
# a shell loop that polls the spot notice every 5 s with curl and treats any
# answer but 404 as an interruption (the bug spotguard does not copy).
# Usage: baseline-poll.sh IMDS_BASE_URL [INTERVAL_SECONDS]
set -u
base=$1
interval=${2:-5}
token=$(curl -s -X PUT "$base/latest/api/token" -H "X-aws-ec2-metadata-token-ttl-seconds: 21600")
while sleep "$interval"; do
  code=$(curl -s -o /dev/null -w '%{http_code}' -H "X-aws-ec2-metadata-token: $token" \
    "$base/latest/meta-data/spot/instance-action")
  if [ "$code" != 404 ]; then
    echo "interruption (HTTP $code)"
  fi
done
