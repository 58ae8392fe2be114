"""How flakescan talks to hardware: a Micro-Manager core, real (micromanager.py) or simulated."""
