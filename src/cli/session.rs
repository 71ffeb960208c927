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
    let interactive = command.is_none();
    let run = |terminal| {
        failures::run(
            store,
            state,
            failures::Session {
                argv: command,
                secrets,
                terminal,
                on_line: &mut |line| println!("{}", line),
                warn: &warn,
            },
        )
    };
    let result = if interactive {
        crate::worker::terminal::with_pty(|tty| run(Some(tty))).and_then(|r| r)
    } else {
        run(None)
    };
    result.map_err(CliError::msg)
}
