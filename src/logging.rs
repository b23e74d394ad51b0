//! Log set-up: text or JSON, level or filter from --log-level.
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat, level: &str) -> Result<(), String> {
    check_directives(level).map_err(|why| format!("--log-level {level:?}: {why}"))?;
    let filter = EnvFilter::try_new(level).map_err(|e| format!("--log-level {level:?}: {e}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colours(std::io::stderr().is_terminal()))
        .with_writer(std::io::stderr);
    let r = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
    r.map_err(|e| format!("log set-up: {e}"))
}

/// A filter that would silence berth by mistake: an empty one, or a bare
/// word that is no level (`infoo`, `debgu`), which the filter syntax takes
/// for a target of that name, so that nothing berth logs passes (it
/// served without a line of log, errors included). A level, or
/// `target=level` directives, pass; so does a bare target that is berth's
/// own (`berth`, `berth::node`): every level of berth's lines.
fn check_directives(level: &str) -> Result<(), String> {
    use tracing_subscriber::filter::LevelFilter;
    if level.trim().is_empty() {
        return Err(
            "empty: give a level (error, warn, info, debug, trace) or a filter such as berth=debug"
                .into(),
        );
    }
    for d in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let berths = |t: &str| {
            t == "berth"
                || t.strip_prefix("berth::").is_some_and(|m| {
                    m.split("::").all(|p| {
                        !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                    })
                })
        };
        if !d.contains('=') && d.parse::<LevelFilter>().is_err() && !berths(d) {
            return Err(format!(
                "{d:?} is no level (off, error, warn, info, debug, trace) and no target=level directive: as a filter it would pass only the logs of a target named {d:?}, and berth would log nothing (for every level of a target, write {d}=trace)"
            ));
        }
    }
    Ok(())
}

/// Terminal colour codes only on a terminal: written to a pipe or a file
/// (a container runtime's log, `kubectl logs`) they are noise.
fn colours(stderr_is_terminal: bool) -> bool {
    stderr_is_terminal
}

/// Tests' log lines, caught: a writer into shared bytes.
#[cfg(test)]
pub(crate) struct Sink(pub std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

#[cfg(test)]
impl std::io::Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{check_directives, colours, Sink};

    #[test]
    fn a_filter_that_would_silence_berth_is_refused() {
        for ok in [
            "info",
            "INFO",
            "debug",
            "off",
            "3",
            "berth=trace",
            "warn,berth=debug",
            "warn, berth::node=debug",
        ] {
            assert!(check_directives(ok).is_ok(), "{ok}");
        }
        for bad in ["", " ", "infoo", "debgu", "warn,bert", "verbose"] {
            assert!(check_directives(bad).is_err(), "{bad:?}");
        }
    }

    /// A bare target is every level of that target: berth's own (`berth`,
    /// a module of it) passes every line berth logs, so it silences
    /// nothing and is taken (it was refused as a word that is no level).
    #[test]
    fn berths_own_target_as_a_bare_word_is_taken() {
        for ok in [
            "berth",
            "warn,berth",
            "berth::kinds",
            "info,berth::kinds::block",
        ] {
            assert!(check_directives(ok).is_ok(), "{ok}");
            // and berth's lines pass it
            let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
            let w = out.clone();
            let sub = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::try_new(ok).unwrap())
                .with_writer(move || Sink(w.clone()))
                .finish();
            tracing::subscriber::with_default(
                sub,
                || tracing::info!(target: "berth::kinds::block::node", "a line of berth's"),
            );
            let got = String::from_utf8(out.lock().unwrap().clone()).unwrap();
            assert!(got.contains("a line of berth's"), "{ok}: {got:?}");
        }
        for bad in ["berthx", "berth:node", "berth::", "warn,berths"] {
            assert!(check_directives(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn colours_only_on_a_terminal() {
        assert!(colours(true));
        assert!(!colours(false));
    }
}
