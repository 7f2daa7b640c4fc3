fn main() -> std::process::ExitCode {
    spotguard_agent::cli::main()
}
