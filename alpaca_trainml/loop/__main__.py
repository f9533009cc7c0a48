"""`python -m alpaca_trainml.loop ...` is `alpaca ...`: what the deepspeed and torchrun launchers start on each rank."""

from alpaca_trainml.loop.command import main

main()
