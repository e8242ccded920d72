"""Operations: doctor, report, demo and the embedded demo broker."""
