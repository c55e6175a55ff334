//! The events enrichers and transformers receive, typed: a CloudEvents 1.0
//! envelope ([`Event`]) whose `data`, for record events, is a
//! [`RecordChange`].

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An event as the host publishes it (CloudEvents 1.0, structured JSON).
/// Every attribute reads as empty when absent, so a partial event (in a
/// test, say) still parses.
///
/// The host restores `id`, `type`, `source`, `specversion`, `subject`,
/// `tenantid` and `time` after an enricher, and the `tenantId`, `resource`,
/// `recordId`, `version` and `previousVersion` of `data`: an enricher adds
/// to `data` and adds extension attributes ([`Event::set_extension`]).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Event {
    /// Unique, time-ordered (UUIDv7); a webhook's `webhook-id`.
    #[serde(default)]
    pub id: String,
    /// `business_store.data.created`, `….updated`, `….deleted`,
    /// `business_store.schema.updated`, …
    #[serde(rename = "type", default)]
    pub event_type: String,
    /// `/business-store/<instance>`.
    #[serde(default)]
    pub source: String,
    /// `<resource>/<record id>` for record events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// When the change was committed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// The tenant whose change this is.
    #[serde(rename = "tenantid", default)]
    pub tenant_id: String,
    /// The `x-request-id` of the request that caused it.
    #[serde(
        rename = "correlationid",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub correlation_id: Option<String>,
    /// What happened; for record events a [`RecordChange`] ([`Event::change`]).
    #[serde(default)]
    pub data: Value,
    /// Every other attribute: `specversion`, `datacontenttype`,
    /// `traceparent`, and the extension attributes enrichers added.
    #[serde(flatten)]
    pub extensions: Map<String, Value>,
}

/// What a record event says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// `business_store.data.created`
    Created,
    /// `business_store.data.updated`
    Updated,
    /// `business_store.data.deleted`
    Deleted,
}

impl ChangeKind {
    /// The event type of this kind of change.
    pub fn event_type(self) -> &'static str {
        match self {
            Self::Created => "business_store.data.created",
            Self::Updated => "business_store.data.updated",
            Self::Deleted => "business_store.data.deleted",
        }
    }
}

/// The `data` of a record event.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct RecordChange {
    /// The tenant.
    #[serde(rename = "tenantId")]
    pub tenant_id: String,
    /// The resource (`invoices`).
    pub resource: String,
    /// The record's id.
    #[serde(rename = "recordId")]
    pub record_id: String,
    /// The record's version after the change (the deleted version for deletes).
    pub version: i64,
    /// The version an update replaced.
    #[serde(
        rename = "previousVersion",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub previous_version: Option<i64>,
    /// The record itself: only when the resource's schema says
    /// `"x-event-payload": "full"` (never on deletes), and never with an
    /// `x-encrypted` field in clear.
    #[serde(rename = "data", default, skip_serializing_if = "Option::is_none")]
    pub record: Option<Value>,
}

impl Event {
    /// A record event for tests: tenant `test`, subject
    /// `<resource>/<record id>`, version 1 (2, after 1, for updates).
    pub fn for_test(
        kind: ChangeKind,
        resource: &str,
        record_id: &str,
        record: Option<Value>,
    ) -> Self {
        let updated = kind == ChangeKind::Updated;
        let change = RecordChange {
            tenant_id: "test".into(),
            resource: resource.into(),
            record_id: record_id.into(),
            version: if updated { 2 } else { 1 },
            previous_version: updated.then_some(1),
            record,
        };
        let mut extensions = Map::new();
        extensions.insert("specversion".into(), "1.0".into());
        Self {
            id: "01890000-0000-7000-8000-000000000000".into(),
            event_type: kind.event_type().into(),
            source: "/business-store/test".into(),
            subject: Some(format!("{resource}/{record_id}")),
            time: Some("2026-01-01T00:00:00Z".into()),
            tenant_id: "test".into(),
            correlation_id: Some("test-request".into()),
            data: serde_json::to_value(change).unwrap_or_default(),
            extensions,
        }
    }

    /// Created, updated or deleted: None for other events.
    pub fn change_kind(&self) -> Option<ChangeKind> {
        [
            ChangeKind::Created,
            ChangeKind::Updated,
            ChangeKind::Deleted,
        ]
        .into_iter()
        .find(|k| k.event_type() == self.event_type)
    }

    /// The record change this event carries (None for other events).
    pub fn change(&self) -> Option<RecordChange> {
        self.change_kind()?;
        serde_json::from_value(self.data.clone()).ok()
    }

    /// The record, when the event carries it (`x-event-payload: full`).
    pub fn record(&self) -> Option<&Value> {
        self.data.get("data").filter(|r| !r.is_null())
    }

    /// An extension attribute.
    pub fn extension(&self, name: &str) -> Option<&Value> {
        self.extensions.get(name)
    }

    /// Sets an extension attribute (CloudEvents: lower-case letters and
    /// digits, at most 20 characters, is what every consumer accepts).
    pub fn set_extension(&mut self, name: &str, value: impl Into<Value>) {
        self.extensions.insert(name.to_owned(), value.into());
    }

    /// The event as JSON.
    pub fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_and_writes_the_hosts_event_unchanged() {
        let text = json!({
            "specversion": "1.0", "id": "e1", "source": "/business-store/x",
            "type": "business_store.data.updated", "subject": "invoices/7",
            "time": "2026-01-01T00:00:00Z", "datacontenttype": "application/json",
            "tenantid": "acme", "correlationid": "r1", "traceparent": "00-ab-cd-01",
            "data": {"tenantId": "acme", "resource": "invoices", "recordId": "7",
                     "version": 3, "previousVersion": 2, "data": {"total": 5}}
        });
        let event: Event = serde_json::from_value(text.clone()).unwrap();
        assert_eq!(event.change_kind(), Some(ChangeKind::Updated));
        let change = event.change().unwrap();
        assert_eq!((change.version, change.previous_version), (3, Some(2)));
        assert_eq!(event.record(), Some(&json!({"total": 5})));
        assert_eq!(event.extension("traceparent"), Some(&json!("00-ab-cd-01")));
        assert_eq!(event.to_value(), text);
    }

    #[test]
    fn a_test_event_is_a_record_change() {
        let e = Event::for_test(ChangeKind::Deleted, "invoices", "9", None);
        let change = e.change().unwrap();
        assert_eq!(
            (change.resource.as_str(), change.record_id.as_str()),
            ("invoices", "9")
        );
        assert!(e.record().is_none());
        assert_eq!(e.subject.as_deref(), Some("invoices/9"));
    }
}
