"""The U-Net that segments tiles into other / monolayer / bilayer. Knows nothing of hardware."""
