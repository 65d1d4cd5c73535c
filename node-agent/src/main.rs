//! `dmvpn-agent`: run the agent, check a configuration, or query a running agent.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use dmvpn_agent::cli::{self, Cli, EXIT_ERROR, EXIT_OK, TopCommand};
use dmvpn_agent::{agent, config};
use tracing_subscriber::EnvFilter;

fn print(s: &str) -> ExitCode {
    // A closed pipe (`| head`) is not an error worth a panic.
    let _ = std::io::stdout().write_all(s.as_bytes());
    ExitCode::from(EXIT_OK)
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("dmvpn-agent: {msg}");
    ExitCode::from(code)
}

fn init_logging(level: &str) {
    // RUST_LOG wins over the configuration file's log_level.
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn run(file: &std::path::Path) -> ExitCode {
    let cfg = match config::load(file) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_ERROR, e),
    };
    init_logging(&cfg.log_level);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail(EXIT_ERROR, format!("cannot start the async runtime: {e}")),
    };
    match rt.block_on(agent::run(cfg)) {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(e) => {
            tracing::error!("{e:#}");
            fail(EXIT_ERROR, format!("{e:#}"))
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        TopCommand::Run { config } => run(&config),
        TopCommand::CheckConfig { file } => match cli::check_config(&file) {
            Ok(s) => print(&s),
            Err(e) => fail(EXIT_ERROR, e),
        },
        TopCommand::Show { what, client } => match cli::client(what.command(), &client) {
            Ok(s) => print(&s),
            Err(e) => fail(cli::client_exit_code(&e), e),
        },
        TopCommand::Clear { what, client } => match cli::client(what.command(), &client) {
            Ok(s) => print(&s),
            Err(e) => fail(cli::client_exit_code(&e), e),
        },
        TopCommand::Cert { what } => match cli::cert(&what) {
            Ok(s) => print(&s),
            Err(e) => fail(EXIT_ERROR, e),
        },
    }
}
