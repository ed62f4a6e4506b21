from infra.local.cli import main

main()
