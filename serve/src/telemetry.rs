//! Logging: `tracing`, configured from `RUST_LOG` (default `info`), with `log` records (aya's)
//! forwarded into it.

use tracing_subscriber::{EnvFilter, fmt};

/// Installs the global subscriber. Call once, early in `main`; a second call is a no-op.
pub fn init() {
    init_with_default("info");
}

/// Installs the global subscriber with `default` as the filter when `RUST_LOG` is not set.
pub fn init_with_default(default: &str) {
    // `log` records from aya reach tracing through the LogTracer; ignore "already set".
    let _ = tracing_log::LogTracer::init();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Untrusted input quoted for a message (an API error, a log line): as `{:?}` prints it, cut
/// after 64 characters with the length said, so that a client cannot make an error message, a
/// gRPC `grpc-message` header or a log line as large as its request.
#[must_use]
pub fn quoted(value: &str) -> String {
    const SHOWN: usize = 64;
    match value.char_indices().nth(SHOWN) {
        None => format!("{value:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &value[..cut], value.len()),
    }
}

/// An error and its sources, one line: `outer: inner: innermost`, each said once. draingate's
/// errors chain their cause and leave it out of their message; some libraries' errors print it
/// too, and are not followed by it again.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(current) = source {
        let part = current.to_string();
        // Errors that print their source already would repeat it.
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = current.source();
    }
    text
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    enum Inner {
        #[error("cannot create netns: File exists")]
        Exists(#[source] std::io::Error),
    }

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("the node simulator failed: {0}")]
        Node(#[from] Inner),
    }

    #[test]
    fn untrusted_input_is_quoted_and_bounded() {
        assert_eq!(super::quoted("web"), "\"web\"");
        let long = "é".repeat(100_000);
        let shown = super::quoted(&long);
        assert!(shown.len() < 200, "{shown}");
        assert!(shown.ends_with("… (200000 bytes)"), "{shown}");
    }

    #[test]
    fn each_cause_is_said_once() {
        let err = Outer::Node(Inner::Exists(std::io::Error::from_raw_os_error(17)));
        assert_eq!(
            super::chain(&err),
            "the node simulator failed: cannot create netns: File exists: File exists (os error \
             17)"
        );
    }
}
