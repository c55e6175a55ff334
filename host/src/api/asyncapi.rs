//! The event contract as an AsyncAPI 3.0 document (`GET /asyncapi.json`):
//! every Kafka topic the service publishes to or consumes, each message's
//! headers (the CloudEvents attributes, binary content mode), key and
//! payload schema. Built from the same names the publisher uses, so the
//! topics cannot drift; the payload shapes are those of `spec/events.md`.

use serde_json::{Map, Value, json};

use crate::archive::import::TENANT_IMPORTED;
use crate::events::consumer::CONSUMED_TOPICS;
use crate::events::envelope::SCHEMA_UPDATED;
use crate::storage::webhooks::{DISABLED_EVENT, FAILED_EVENT};

const KAFKA_BINDING: &str = "0.5.0";

/// The document, for a service publishing to `dead_letter_topic` and, when
/// set, the record topic.
pub fn document(dead_letter_topic: &str, record_topic: Option<&str>) -> Value {
    let mut channels = Map::new();
    let mut operations = Map::new();
    let mut publish = |id: &str, address: &str, message: &str, description: &str| {
        channels.insert(
            id.into(),
            json!({
                "address": address,
                "description": description,
                "messages": {message: {"$ref": format!("#/components/messages/{message}")}},
            }),
        );
        operations.insert(
            format!("publish_{id}"),
            json!({
                "action": "send",
                "channel": {"$ref": format!("#/channels/{id}")},
                "messages": [{"$ref": format!("#/channels/{id}/messages/{message}")}],
            }),
        );
    };
    publish(
        "schemaUpdated",
        SCHEMA_UPDATED,
        "schemaUpdated",
        "A tenant's resource schema got a new version.",
    );
    for action in ["created", "updated", "deleted"] {
        publish(
            &format!("data{}", capitalized(action)),
            &format!("business_store.data.{action}"),
            &format!("data{}", capitalized(action)),
            &format!(
                "A record was {action} (with BSS_KAFKA_TOPIC_PER_RESOURCE the topic is business_store.data.<resource>.{action})."
            ),
        );
    }
    publish(
        "webhookFailed",
        FAILED_EVENT,
        "webhookFailed",
        "A webhook delivery was given up after its last attempt.",
    );
    publish(
        "webhookDisabled",
        DISABLED_EVENT,
        "webhookDisabled",
        "A webhook endpoint was disabled (410 Gone, or failing too long).",
    );
    publish(
        "tenantImported",
        TENANT_IMPORTED,
        "tenantImported",
        "A tenant was imported from an archive (bss tenant import or POST /v1/tenants/import): one event, not one per record.",
    );
    if let Some(topic) = record_topic {
        channels.insert(
            "records".into(),
            json!({
                "address": topic,
                "description": "Every record event again, keyed by record: one partition holds a record's whole history in order (BSS_KAFKA_RECORD_TOPIC).",
                "messages": {
                    "dataCreated": {"$ref": "#/components/messages/dataCreated"},
                    "dataUpdated": {"$ref": "#/components/messages/dataUpdated"},
                    "dataDeleted": {"$ref": "#/components/messages/dataDeleted"},
                },
            }),
        );
        operations.insert(
            "publish_records".into(),
            json!({"action": "send", "channel": {"$ref": "#/channels/records"}}),
        );
    }
    for topic in CONSUMED_TOPICS {
        let id = if topic.ends_with("created") {
            "tenantCreated"
        } else {
            "tenantDeleted"
        };
        channels.insert(
            id.into(),
            json!({
                "address": topic,
                "description": "Announced by the Auth Service; consumed by the service's consumer group.",
                "messages": {id: {"$ref": format!("#/components/messages/{id}")}},
            }),
        );
        operations.insert(
            format!("consume_{id}"),
            json!({
                "action": "receive",
                "channel": {"$ref": format!("#/channels/{id}")},
                "messages": [{"$ref": format!("#/channels/{id}/messages/{id}")}],
            }),
        );
    }
    channels.insert(
        "deadLetter".into(),
        json!({
            "address": dead_letter_topic,
            "description": "Consumed messages that could not be applied, as they arrived.",
            "messages": {"deadLetter": {"$ref": "#/components/messages/deadLetter"}},
        }),
    );
    operations.insert(
        "publish_deadLetter".into(),
        json!({"action": "send", "channel": {"$ref": "#/channels/deadLetter"}}),
    );

    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "Business Store events",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Every change to a tenant's schemas and records, as CloudEvents 1.0 in Kafka binary content mode: the attributes are `ce_` headers, the value is the event's data. With BSS_KAFKA_STRUCTURED=true the value is the whole envelope instead (application/cloudevents+json) and there are no `ce_` headers. The same events are served by GET /v1/events and its SSE stream.",
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages(),
            "schemas": schemas(),
        },
    })
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

fn message(kind: &str, title: &str, payload: &str, key: &str) -> Value {
    json!({
        "name": kind,
        "title": title,
        "contentType": "application/json",
        "headers": {"$ref": "#/components/schemas/CloudEventHeaders"},
        "payload": {"$ref": format!("#/components/schemas/{payload}")},
        "bindings": {"kafka": {
            "key": {"type": "string", "description": key},
            "bindingVersion": KAFKA_BINDING,
        }},
    })
}

fn messages() -> Value {
    const RECORD_KEY: &str = "<tenantId>/<resource>/<recordId>";
    const WEBHOOK_KEY: &str = "<tenantId>/_webhooks";
    let tenant_message = |title: &str| {
        json!({
            "name": title,
            "title": title,
            "contentType": "application/json",
            "payload": {"$ref": "#/components/schemas/TenantAnnouncement"},
            "bindings": {"kafka": {
                "key": {"type": "string", "description": "any (the tenant id, usually)"},
                "bindingVersion": KAFKA_BINDING,
            }},
        })
    };
    json!({
        "schemaUpdated": message(SCHEMA_UPDATED, "Schema updated", "SchemaUpdated", "<tenantId>/<resource>"),
        "dataCreated": message("business_store.data.created", "Record created", "RecordCreated", RECORD_KEY),
        "dataUpdated": message("business_store.data.updated", "Record updated", "RecordUpdated", RECORD_KEY),
        "dataDeleted": message("business_store.data.deleted", "Record deleted", "RecordDeleted", RECORD_KEY),
        "webhookFailed": message(FAILED_EVENT, "Webhook delivery failed", "WebhookFailed", WEBHOOK_KEY),
        "webhookDisabled": message(DISABLED_EVENT, "Webhook endpoint disabled", "WebhookDisabled", WEBHOOK_KEY),
        "tenantImported": message(TENANT_IMPORTED, "Tenant imported", "TenantImported", "<tenantId>"),
        "tenantCreated": tenant_message("auth.tenant.created"),
        "tenantDeleted": tenant_message("auth.tenant.deleted"),
        "deadLetter": {
            "name": "deadLetter",
            "title": "Dead-lettered message",
            "summary": "The consumed message's bytes as they arrived.",
            "headers": {
                "type": "object",
                "properties": {
                    "dlq_topic": {"type": "string", "description": "the topic it was consumed from"},
                    "dlq_reason": {"type": "string", "description": "why it could not be applied"},
                },
            },
            "payload": {"type": "string"},
            "bindings": {"kafka": {
                "key": {"type": "string", "description": "<topic>/<partition>/<offset>"},
                "bindingVersion": KAFKA_BINDING,
            }},
        },
    })
}

fn schemas() -> Value {
    let record = |extra: Value| {
        let mut properties = json!({
            "tenantId": {"type": "string"},
            "resource": {"type": "string"},
            "recordId": {"type": "string"},
            "version": {"type": "integer", "minimum": 1},
        });
        if let (Some(p), Some(e)) = (properties.as_object_mut(), extra.as_object()) {
            p.extend(e.clone());
        }
        json!({
            "type": "object",
            "required": ["tenantId", "resource", "recordId", "version"],
            "properties": properties,
            "description": "Event enrichers may add properties.",
        })
    };
    let full = json!({"data": {
        "type": "object",
        "description": "The record, where the resource's schema says \"x-event-payload\": \"full\" (never an x-encrypted field in clear).",
    }});
    let mut updated = full.clone();
    updated["previousVersion"] = json!({"type": "integer", "minimum": 1});
    json!({
        "CloudEventHeaders": {
            "type": "object",
            "description": "The CloudEvents attributes as Kafka headers (binary content mode); content-type is the event's datacontenttype.",
            "required": ["ce_specversion", "ce_id", "ce_source", "ce_type", "ce_time", "ce_tenantid", "content-type"],
            "properties": {
                "ce_specversion": {"type": "string", "const": "1.0"},
                "ce_id": {"type": "string", "description": "Unique, time-ordered (UUIDv7): the dedupe key."},
                "ce_source": {"type": "string", "description": "/business-store/<instance>"},
                "ce_type": {"type": "string"},
                "ce_subject": {"type": "string", "description": "<resource>/<recordId>, or <resource>"},
                "ce_time": {"type": "string", "format": "date-time"},
                "ce_tenantid": {"type": "string"},
                "ce_correlationid": {"type": "string", "description": "The x-request-id of the request that caused the event."},
                "ce_traceparent": {"type": "string", "description": "W3C traceparent in the trace of the request that caused the event, when it came with one (CloudEvents distributed tracing extension)."},
                "ce_bsshooks": {"type": "string", "description": "The validation hook versions that passed the write, `name@version` comma-separated (when hooks ran)."},
                "ce_bssenrichers": {"type": "string", "description": "The event enricher versions that made the event, `name@version` comma-separated (when enrichers ran)."},
                "content-type": {"type": "string", "const": "application/json"},
            },
        },
        "SchemaUpdated": {
            "type": "object",
            "required": ["tenantId", "resource", "version"],
            "properties": {
                "tenantId": {"type": "string"},
                "resource": {"type": "string"},
                "version": {"type": "integer", "minimum": 1},
                "timestamp": {"type": "string", "format": "date-time"},
                "initiator": {"type": "string", "description": "user:<sub>"},
            },
        },
        "RecordCreated": record(full),
        "RecordUpdated": record(updated),
        "RecordDeleted": record(json!({})),
        "WebhookFailed": {
            "type": "object",
            "required": ["tenantId", "webhookId", "deliveryId", "eventId", "eventType", "attempts"],
            "properties": {
                "tenantId": {"type": "string"},
                "webhookId": {"type": "string", "format": "uuid"},
                "deliveryId": {"type": "string", "format": "uuid"},
                "eventId": {"type": "string"},
                "eventType": {"type": "string"},
                "attempts": {"type": "integer"},
                "lastStatusCode": {"type": ["integer", "null"]},
                "lastError": {"type": ["string", "null"]},
            },
        },
        "WebhookDisabled": {
            "type": "object",
            "required": ["tenantId", "webhookId", "reason"],
            "properties": {
                "tenantId": {"type": "string"},
                "webhookId": {"type": "string", "format": "uuid"},
                "reason": {"type": "string"},
            },
        },
        "TenantImported": {
            "type": "object",
            "required": ["tenantId", "exportedAs", "records"],
            "properties": {
                "tenantId": {"type": "string"},
                "exportedAs": {"type": "string", "description": "The tenant id in the archive (another one with --as)."},
                "resources": {"type": "integer"},
                "schemaVersions": {"type": "integer"},
                "records": {"type": "integer"},
                "plugins": {"type": "integer"},
                "pluginVersions": {"type": "integer"},
                "webhooks": {"type": "integer"},
                "events": {"type": "integer", "description": "Events of the log brought in (archives made with --with-events; absent when none). They are in the tenant's log for reading and replay, and were not published again."},
            },
        },
        "TenantAnnouncement": {
            "type": "object",
            "description": "Bare, or as a CloudEvent's data (structured JSON).",
            "required": ["tenantId"],
            "properties": {
                "tenantId": {"type": "string"},
                "name": {"type": "string", "description": "auth.tenant.created only; else the Auth Service is asked"},
            },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reference_points_at_something_defined() {
        let doc = document("dlq", Some("records"));
        fn refs(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    for (k, v) in m {
                        if k == "$ref" {
                            out.extend(v.as_str().map(str::to_owned));
                        } else {
                            refs(v, out);
                        }
                    }
                }
                Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
                _ => {}
            }
        }
        let mut found = Vec::new();
        refs(&doc, &mut found);
        assert!(found.len() > 20);
        for r in found {
            let pointer = r.trim_start_matches('#');
            assert!(doc.pointer(pointer).is_some(), "{r} is not defined");
        }
    }
}
