//! Values both renderers print, as plain text: HTML escapes them and Markdown
//! puts them in cells, so the two formats of one report never say different
//! things about the same record.

use super::model::{Backups, Deletion, Drill, Epoch, KeyCustody, Summary};

impl Summary {
    /// "2 tenant(s), 18 controls: 15 passed, 1 failed, 2 not applicable."
    pub fn counts(&self) -> String {
        format!(
            "{} tenant(s), {} controls: {} passed, {} failed, {} not applicable.",
            self.tenants, self.controls, self.passed, self.failed, self.not_applicable
        )
    }
}

impl Backups {
    /// "97.5%", or "-" without runs.
    pub fn success_rate_text(&self) -> String {
        self.success_rate
            .map(|r| format!("{:.1}%", r * 100.0))
            .unwrap_or_else(|| "-".into())
    }
}

impl Drill {
    /// What became of the drill's verify command: "none", "not recorded",
    /// or "<program>: passed / failed (exit N) / timed out / not run".
    pub fn verify_outcome(&self) -> String {
        let Some(v) = &self.verify_command else {
            return match self.figures_recorded {
                true => "none".into(),
                false => "not recorded".into(),
            };
        };
        let outcome = if v.not_run {
            "not run".into()
        } else if v.timed_out {
            "timed out".into()
        } else if v.passed {
            "passed".into()
        } else {
            match v.exit_code {
                Some(code) => format!("failed (exit {code})"),
                None => "failed".into(),
            }
        };
        format!("{}: {outcome}", v.program.as_deref().unwrap_or("-"))
    }
}

impl KeyCustody {
    /// The state its provider reports now, "unknown: <why>" when it could
    /// not be asked.
    pub fn state_text(&self) -> String {
        match (&self.state, &self.error) {
            (Some(s), _) => s.clone(),
            (None, Some(e)) => format!("unknown: {e}"),
            (None, None) => "-".into(),
        }
    }
}

impl Epoch {
    /// "#12" or "#12, shredded #40".
    pub fn records(&self) -> String {
        match self.shredded_seq {
            Some(s) => format!("#{}, shredded #{s}", self.created_seq),
            None => format!("#{}", self.created_seq),
        }
    }
}

impl Deletion {
    /// "tenant" or "epoch N".
    pub fn subject_label(&self) -> String {
        match self.epoch {
            Some(e) => format!("epoch {e}"),
            None => "tenant".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::model::VerifyCommand;
    use super::*;

    fn drill(verify_command: Option<VerifyCommand>, figures_recorded: bool) -> Drill {
        Drill {
            time: chrono::Utc::now(),
            seq: 7,
            begin_seq: None,
            outcome: "failed".into(),
            reason: None,
            snapshot: None,
            mode: None,
            restore_seconds: None,
            rto_seconds: None,
            rto_met: None,
            verify_command,
            figures_recorded,
        }
    }

    #[test]
    fn a_verify_command_that_never_ran_is_not_called_failed() {
        let v = |passed, timed_out, not_run, exit_code| VerifyCommand {
            program: Some("sqlite3".into()),
            passed,
            exit_code,
            timed_out,
            not_run,
        };
        let cases = [
            (drill(None, true), "none"),
            (drill(None, false), "not recorded"),
            (
                drill(Some(v(true, false, false, Some(0))), true),
                "sqlite3: passed",
            ),
            (
                drill(Some(v(false, true, false, None)), true),
                "sqlite3: timed out",
            ),
            (
                drill(Some(v(false, false, true, None)), true),
                "sqlite3: not run",
            ),
            (
                drill(Some(v(false, false, false, Some(3))), true),
                "sqlite3: failed (exit 3)",
            ),
        ];
        for (d, said) in cases {
            assert_eq!(d.verify_outcome(), said);
        }
    }
}
