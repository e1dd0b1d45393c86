"""`python -m deeplab_dropout.data` runs the `deeplab-dropout-data` command."""
from deeplab_dropout.commands.data import main

if __name__ == "__main__":
    main()
