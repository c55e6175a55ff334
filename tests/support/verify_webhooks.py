"""Verifies webhook deliveries with the Standard Webhooks reference library.

Reads JSON from stdin: a list of {"secret", "headers", "body"}; prints a
JSON list with, for each, "ok" or why the reference library refused it.
"""
import json
import sys

from standardwebhooks.webhooks import Webhook

results = []
for item in json.load(sys.stdin):
    try:
        Webhook(item["secret"]).verify(item["body"], item["headers"], json_parse=False)
        results.append("ok")
    except Exception as e:  # the library's refusals, reported to the test
        results.append(f"{type(e).__name__}: {e}")
print(json.dumps(results))
