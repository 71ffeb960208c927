//! The `builder` binary: parse arguments, run, render errors.

use clap::Parser;

fn main() {
    let cli = builder::cli::Cli::parse();
    if let Err(e) = builder::cli::run(cli) {
        if !e.message.is_empty() {
            eprintln!("error: {}", e.message);
        }
        for c in &e.causes {
            eprintln!("  Caused by: {}", c);
        }
        if let Some(h) = &e.hint {
            eprintln!("  hint: {}", h);
        }
        std::process::exit(e.exit_code);
    }
}
