"""The model in pure torch: encoders, the linear decoder and the count likelihoods."""
