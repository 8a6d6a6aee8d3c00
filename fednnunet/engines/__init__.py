"""Engines move messages between the server and the sites; they never know a method."""
