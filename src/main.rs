use std::process::ExitCode;

use clap::Parser;
use tally::config::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Flushes traces when main returns.
    let _telemetry = tally::telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Command::Ops(cmd) = cli.command {
        return runtime.block_on(tally::cli::run(cmd, cli.client));
    }
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Migrate(args) => {
            let opts = args
                .db
                .store_options("tally-migrate")
                .map_err(anyhow::Error::msg)?;
            let store = tally::store::Store::connect(&opts).await?;
            store.migrate().await?;
            eprintln!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Serve(args) => {
            let settings = args.settings().map_err(anyhow::Error::msg)?;
            let (trigger, shutdown) = tally::shutdown::channel();
            tokio::spawn(async move {
                tally::shutdown::os_signal().await;
                trigger.fire();
            });
            tally::app::serve(settings, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => tally::demo::run(*args).await,
        Command::Bench(args) => tally::bench::run(*args).await,
        Command::Ops(_) => unreachable!("handled in main"),
    }
}
