from lora_cli.cli.app import main

main()
