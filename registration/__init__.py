"""Fitting the hand model to captured data: scan sequences and keypoints (metres throughout)."""
