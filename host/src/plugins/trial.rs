//! A plugin's version on trial beside the active one: a shadow runs on the
//! same calls after the active version (a hook's writes, an enricher's
//! events, a transformer's deliveries), never changing them, and only on a
//! call slot free at once, from its tenant's share; what it answers is
//! compared with the active version's. A canary answers a share of calls
//! itself. What each did is counted here, per replica, with the latest
//! disagreements as examples.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::Loaded;
use super::calls::Verdict;
use crate::storage::plugins::Trial as Mode;

/// Disagreements kept as examples.
const EXAMPLES: usize = 10;

/// A loaded version on trial.
#[derive(Debug)]
pub struct Trial {
    pub version: i32,
    pub mode: Mode,
    pub loaded: Result<Loaded, String>,
    pub stats: std::sync::Arc<TrialStats>,
}

impl Trial {
    /// Whether this call goes to the canary.
    pub fn takes_this_call(&self) -> bool {
        match self.mode {
            Mode::Canary(percent) => rand::random_range(0..100) < i32::from(percent),
            Mode::Shadow => false,
        }
    }

    pub fn is_shadow(&self) -> bool {
        self.mode == Mode::Shadow
    }
}

#[derive(Debug, Default)]
pub struct TrialStats {
    calls: AtomicU64,
    failures: AtomicU64,
    agreements: AtomicU64,
    disagreements: AtomicU64,
    /// Shadow runs left out: no call slot was free at once.
    skipped: AtomicU64,
    examples: Mutex<VecDeque<Value>>,
}

/// What a trial did so far (this replica, since it started here).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrialStatsView {
    pub calls: u64,
    pub failures: u64,
    /// Shadows: calls whose verdict matched the active version's.
    pub agreements: u64,
    pub disagreements: u64,
    pub skipped: u64,
    /// The latest disagreements: the input (a hook's record with its
    /// `x-encrypted` values redacted, an enricher's event, a transformer's
    /// request) and both verdicts.
    #[schema(value_type = Vec<Object>)]
    pub examples: Vec<Value>,
}

impl TrialStats {
    /// A call of the trial version, and whether it failed.
    pub fn called(&self, failed: bool) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn skipped(&self) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
    }

    /// Compares a shadow's verdict with the active version's; `example`
    /// (built only on a disagreement) says on what.
    pub fn compare(&self, active: &Verdict, shadow: &Verdict, example: impl FnOnce() -> Value) {
        if same(active, shadow) {
            self.agreements.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.disagreements.fetch_add(1, Ordering::Relaxed);
        let mut example = example();
        example["active"] = json!(active);
        example["trial"] = json!(shadow);
        let mut kept = self.examples.lock().unwrap_or_else(|p| p.into_inner());
        if kept.len() == EXAMPLES {
            kept.pop_front();
        }
        kept.push_back(example);
    }

    pub fn view(&self) -> TrialStatsView {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        TrialStatsView {
            calls: get(&self.calls),
            failures: get(&self.failures),
            agreements: get(&self.agreements),
            disagreements: get(&self.disagreements),
            skipped: get(&self.skipped),
            examples: self
                .examples
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .rev()
                .cloned()
                .collect(),
        }
    }
}

/// Two verdicts agree when both accept, both fail the same way, both
/// refuse at the same places with the same codes (messages may differ), or
/// both make the same event or request (or both drop or cancel).
fn same(a: &Verdict, b: &Verdict) -> bool {
    if a.verdict != b.verdict {
        return false;
    }
    let places = |v: &Verdict| {
        let mut p: Vec<(String, String)> = v.detail["violations"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| (x["path"].to_string(), x["code"].to_string()))
            .collect();
        p.sort();
        p
    };
    match a.verdict {
        "refused" => places(a) == places(b),
        "failed" => a.detail["kind"] == b.detail["kind"],
        "enriched" | "transformed" => a.detail == b.detail,
        _ => true,
    }
}
