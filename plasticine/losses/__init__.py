"""plasticine.losses."""
