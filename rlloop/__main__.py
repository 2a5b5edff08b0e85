from rlloop.train import main

main()
