"""Reads Kafka messages back as CloudEvents with the official Python SDK.

Reads JSON from stdin: a list of {"headers": {name: value}, "key", "value"}
as a Kafka consumer received them; prints a JSON list with, for each, the
event the SDK's `from_kafka_event` made of it ({"attributes", "data"}) or
{"error": why the SDK refused it}.
"""
import json
import sys

from cloudevents.core.bindings.kafka import KafkaMessage, from_kafka_event

results = []
for item in json.load(sys.stdin):
    message = KafkaMessage(
        headers={k: v.encode() for k, v in item["headers"].items()},
        key=item["key"].encode() if item["key"] is not None else None,
        value=item["value"].encode(),
    )
    try:
        event = from_kafka_event(message)
        attributes = {k: (v.isoformat() if hasattr(v, "isoformat") else v)
                      for k, v in event.get_attributes().items()}
        results.append({"attributes": attributes, "data": event.get_data()})
    except Exception as e:  # the SDK's refusals, reported to the test
        results.append({"error": f"{type(e).__name__}: {e}"})
print(json.dumps(results))
