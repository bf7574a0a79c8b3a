"""moe-apps: applications of moe_core (recommendation, vision, translation) and their data layer."""

__version__ = "0.1.0"
