package keystore

import (
	"bytes"
	"context"
	"crypto/sha256"
	"strconv"
)

// Data keys: a DEK is random bytes from the HSM, returned to the caller and sealed under a
// symmetric CMK in the same blob format as encrypt-data (the API layer writes them in hex).

// DatakeyBits returns the DEK size in bits for a create-datakey request: datakey_length
// wins over key_spec; neither means 256.
func DatakeyBits(spec, length string) (int, error) {
	if length != "" {
		n, err := strconv.Atoi(length)
		switch {
		case err != nil || n < 8 || n > 8192:
			return 0, newError(KindDatakeyLengthRange, "datakey_length must be from 8 to 8192 bits")
		case n%8 != 0:
			return 0, newError(KindDatakeyMultiple, "datakey_length must be a multiple of 8")
		}
		return n, nil
	}
	switch spec {
	case "", "AES_256":
		return 256, nil
	case "AES_128":
		return 128, nil
	}
	return 0, newError(KindDatakeySpec, "key_spec must be AES_128 or AES_256")
}

// symmetricKey returns the caller's symmetric key id, usable for encryption, and its cluster.
func (s *Service) symmetricKey(ctx context.Context, who Caller, id string) (Cluster, error) {
	k, cl, err := s.usableKey(ctx, who, id, UsageEncryptDecrypt)
	if err != nil {
		return Cluster{}, err
	}
	if !keySpecs[k.Spec].symmetric {
		return Cluster{}, newError(KindAlgorithmMismatch, "data keys need a symmetric key; %s is %s", id, k.Spec)
	}
	return cl, nil
}

// CreateDatakey makes a DEK of bits on the HSM and returns it with its sealed form.
func (s *Service) CreateDatakey(ctx context.Context, who Caller, id string, bits int, aad []byte) (dek, sealed []byte, err error) {
	cl, err := s.symmetricKey(ctx, who, id)
	if err != nil {
		return nil, nil, err
	}
	if dek, err = cl.Random(ctx, bits/8); err != nil {
		return nil, nil, hsmError("create-datakey", err)
	}
	if sealed, err = s.sealBlob(ctx, cl, id, dek, aad); err != nil {
		return nil, nil, err
	}
	return dek, sealed, nil
}

// EncryptDatakey seals a caller's DEK. plain is DEK ‖ SHA-256(DEK), and dekLen the DEK's
// length in bytes: both are checked, so a truncated or altered DEK is refused.
func (s *Service) EncryptDatakey(ctx context.Context, who Caller, id string, plain []byte, dekLen int, aad []byte) ([]byte, error) {
	if dekLen < 1 || dekLen > 1024 || len(plain) != dekLen+sha256.Size {
		return nil, newError(KindDatakeyLength, "plain_text must be datakey_plain_length bytes of DEK followed by its 32-byte SHA-256")
	}
	dek, sum := plain[:dekLen], plain[dekLen:]
	if want := sha256.Sum256(dek); !bytes.Equal(sum, want[:]) {
		return nil, newError(KindDatakeyDigest, "the SHA-256 in plain_text does not match the DEK")
	}
	cl, err := s.symmetricKey(ctx, who, id)
	if err != nil {
		return nil, err
	}
	return s.sealBlob(ctx, cl, id, dek, aad)
}

// DecryptDatakey opens a sealed DEK of key id and checks its length against dekLen.
func (s *Service) DecryptDatakey(ctx context.Context, who Caller, id string, sealed []byte, dekLen int, aad []byte) ([]byte, error) {
	if blobKey, ok := blobKeyID(sealed); !ok || blobKey != id {
		return nil, newError(KindDatakeyCipherText, "cipher_text is not a data key sealed by key %s", id)
	}
	_, dek, err := s.openBlob(ctx, who, id, sealed, aad)
	if err != nil {
		return nil, err
	}
	if len(dek) != dekLen {
		return nil, newError(KindDatakeyLength, "the data key is %d bytes, not datakey_cipher_length %d", len(dek), dekLen)
	}
	return dek, nil
}
