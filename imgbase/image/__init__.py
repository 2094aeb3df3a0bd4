"""What an image is: its spec, names, kernel arguments, trust (signatures, verified
copies), downloads, info and packaging."""
