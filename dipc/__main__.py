from dipc.cli import main

main()
