"""Codistillation: the losses and the teacher sources (TeacherSource; PeerExchange through DCP versions)."""
