from rlloop.search.cli import main

main()
