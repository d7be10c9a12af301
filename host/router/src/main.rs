//! The `switchyard` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchyard::config::Config;

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "High-availability OpenAI-compatible router for self-hosted LLMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the router with a configuration file.
    Serve {
        /// Path to the TOML configuration.
        #[arg(long, short)]
        config: PathBuf,
        /// Worker threads (defaults to the number of CPU cores).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Validate a configuration file without starting; exits non-zero with file, line and reason.
    CheckConfig {
        /// Path to the TOML configuration.
        file: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckConfig { file } => match Config::load(&file) {
            Ok(cfg) => {
                let endpoints: usize = cfg.models.iter().map(|m| m.endpoints.get_ref().len()).sum();
                println!(
                    "{}: ok ({} listener(s), {} model(s), {} endpoint(s))",
                    file.display(),
                    cfg.listeners.len(),
                    cfg.models.len(),
                    endpoints
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Serve { config, workers } => {
            init_tracing();
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::from(2);
                }
            };
            let mut rt = tokio::runtime::Builder::new_multi_thread();
            rt.enable_all();
            if let Some(w) = workers {
                rt.worker_threads(w.max(1));
            }
            let rt = rt.build().expect("tokio runtime");
            let result = rt.block_on(async {
                let router = switchyard::router::Router::start(&cfg);
                switchyard::listener::serve(&cfg, router).await
            });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("SWITCHYARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
