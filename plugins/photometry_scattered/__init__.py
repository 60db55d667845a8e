"""Built-in scattered-light cube (prepare stage) and stamp corrector."""
