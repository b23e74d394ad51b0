//! Log set-up: text or JSON, level or filter from --log-level.
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat, level: &str) -> Result<(), String> {
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

/// Terminal colour codes only on a terminal: written to a pipe or a file
/// (a container runtime's log, `kubectl logs`) they are noise.
fn colours(stderr_is_terminal: bool) -> bool {
    stderr_is_terminal
}

#[cfg(test)]
mod tests {
    use super::colours;

    #[test]
    fn colours_only_on_a_terminal() {
        assert!(colours(true));
        assert!(!colours(false));
    }
}
