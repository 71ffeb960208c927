//! The `builder` binary: parse arguments, run, render errors.

use clap::Parser;

fn main() {
    // Whatever descriptors the caller left open (a CI agent's, a shell's) are builder's to
    // drop before anything runs: no step may reach them.
    builder::worker::sandbox::close_descriptors_from_3(false);
    let cli = builder::cli::Cli::parse();
    if let Err(e) = builder::cli::run(cli) {
        eprint!("{}", e.report());
        std::process::exit(e.exit_code);
    }
}
