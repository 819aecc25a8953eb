from fsltool.cli import main

main()
