from arctrain.cli import main

main()
