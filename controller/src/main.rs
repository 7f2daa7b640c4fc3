fn main() -> std::process::ExitCode {
    spotguard_controller::cli::main()
}
