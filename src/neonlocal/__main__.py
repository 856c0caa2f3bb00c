from neonlocal.cli import main

main()
