"""The control process's side of every instance's host calls: the `ControlPlane` (contexts,
forward passes, delegated generations, messaging, sessions, children, by instance id)."""
