from rlloop.cli import main

main()
