//! The process's own families: the build, and config reloads.

use prometheus::{IntCounterVec, IntGauge};

use super::{Outcome, Register};

pub struct ProcessMetrics {
    reloads: IntCounterVec,
    last_reload_ok: IntGauge,
}

impl ProcessMetrics {
    pub fn register(r: &Register<'_>) -> Self {
        let build_info = r.int_gauges(
            "build_info",
            "Always 1; the version label names the build.",
            &["version"],
        );
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let reloads = r.counters(
            "config_reloads_total",
            "Config reloads, by outcome (a failure keeps the running config).",
            &["result"],
        );
        let last_reload_ok = r.int_gauge(
            "config_last_reload_successful",
            "1 when the last config reload was applied (or none was tried), 0 when it was refused.",
        );
        for result in Outcome::ALL {
            reloads.with_label_values(&[result.as_str()]);
        }
        last_reload_ok.set(1);
        Self {
            reloads,
            last_reload_ok,
        }
    }

    /// Records a reload's outcome.
    pub fn reload(&self, applied: bool) {
        let result = if applied { Outcome::Success } else { Outcome::Failure };
        self.reloads.with_label_values(&[result.as_str()]).inc();
        self.last_reload_ok.set(i64::from(applied));
    }
}
