from mxguard.cli import main

main()
