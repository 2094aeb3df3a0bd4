"""Install kickstarts for anaconda and their site parameters."""
