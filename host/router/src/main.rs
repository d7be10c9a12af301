//! The `switchyard` command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use switchyard::config::Config;

/// mimalloc: per-thread heaps suit the thread-per-core data plane (each request's buffers
/// are allocated and freed on one worker). One unrepeated comparison with glibc's malloc
/// showed less CPU per request (ARCHITECTURE.md, "mimalloc").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "switchyard", version, about = "High-availability OpenAI-compatible router for self-hosted LLMs")]
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
        /// Data-plane worker threads, one event loop each (defaults to the number of CPU cores).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Validate a configuration file without starting; exits non-zero with file, line and reason.
    CheckConfig {
        /// Path to the TOML configuration.
        file: PathBuf,
    },
    /// Work with policy plugins.
    #[command(subcommand)]
    Plugin(PluginCommand),
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Validate a policy component offline: compile, contract and imports, init, self-test.
    Check {
        /// The component (.wasm).
        file: PathBuf,
        /// JSON handed to the plugin's init (its config section).
        #[arg(long, default_value = "{}")]
        config: String,
    },
    /// Turn a core module built with the SDK (wasm32-unknown-unknown) into a component.
    Componentize {
        /// The core module (.wasm).
        module: PathBuf,
        /// Where to write the component.
        #[arg(long, short)]
        output: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Plugin(cmd) => plugin_command(cmd),
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
            let workers = workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get())).max(1);
            // The control plane (admin, health checks, plugin watcher, supervisor) gets one
            // thread; the data plane runs thread-per-core inside `listener::serve`.
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("control")
                .enable_all()
                .build()
                .expect("tokio runtime");
            let result = rt.block_on(async {
                let router = switchyard::router::Router::start(&cfg, workers).await?;
                switchyard::listener::serve(&cfg, router, workers).await
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

fn plugin_command(cmd: PluginCommand) -> ExitCode {
    match cmd {
        PluginCommand::Check { file, config } => {
            let bytes = match std::fs::read(&file) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("error: {}: cannot read: {e}", file.display());
                    return ExitCode::from(2);
                }
            };
            let name = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            match switchyard::plugin::check_offline(&name, &bytes, &config) {
                Ok(report) => {
                    println!("{}: ok: {report}", file.display());
                    ExitCode::SUCCESS
                }
                Err(reason) => {
                    eprintln!("error: {}: {reason}", file.display());
                    ExitCode::from(1)
                }
            }
        }
        PluginCommand::Componentize { module, output } => {
            let result = std::fs::read(&module)
                .map_err(anyhow::Error::from)
                .and_then(|m| switchyard::plugin::componentize::componentize(&m))
                .and_then(|c| {
                    let tmp = output.with_extension("wasm.tmp");
                    std::fs::write(&tmp, c)?;
                    std::fs::rename(&tmp, &output)?;
                    Ok(())
                });
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {}: {e:#}", module.display());
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SWITCHYARD_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}
