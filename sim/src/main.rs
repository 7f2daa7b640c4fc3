fn main() -> std::process::ExitCode {
    spotguard_sim::cli::main()
}
