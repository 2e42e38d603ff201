"""Weight sync: the trainer's weights in Hugging Face format, and servers updated with them."""
