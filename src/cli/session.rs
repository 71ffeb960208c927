//! A debug session's terminal side: the failed step's place said first, then its command's
//! output, or a pty for an interactive shell. `builder debug shell` and `builder build
//! --on-error=shell` open one.

use crate::solver::failures;
use crate::worker::Exit;

use super::CliError;

/// Run a session over `state`: on a pty when no command is given, else the command's
/// output on stdout.
pub fn open_session(
    store: &crate::store::Store,
    state: &failures::DebugState,
    command: Option<Vec<String>>,
    secrets: std::collections::BTreeMap<String, crate::solver::mounts::SecretSource>,
) -> Result<Exit, CliError> {
    let warn = |m: &str| eprintln!("warning: {}", m);
    if !state.id.is_empty() {
        eprintln!(
            "# {}:{} [stage-{}] {}",
            state.file, state.line, state.stage, state.instruction
        );
    }
    let result = match command {
        Some(argv) => failures::run(
            store,
            state,
            failures::Session {
                argv: Some(argv),
                secrets,
                terminal: None,
                on_line: &mut |line| println!("{}", line),
                warn: &warn,
            },
        ),
        None => crate::worker::terminal::with_pty(|tty| {
            failures::run(
                store,
                state,
                failures::Session {
                    argv: None,
                    secrets,
                    terminal: Some(tty),
                    on_line: &mut |_| {},
                    warn: &warn,
                },
            )
        })
        .and_then(|r| r),
    };
    result.map_err(CliError::msg)
}
