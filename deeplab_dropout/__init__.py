"""Reproduction of 'Don't ignore Dropout in Fully Convolutional Networks' (Spilsbury & Camps, 2019)."""
