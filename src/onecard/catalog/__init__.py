"""Pure data about hardware and models. No torch imports."""
