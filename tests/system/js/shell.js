// A mongosh script: the same shape of workload through the shell's own driver (CRUD, aggregate, getMores, an error).
const d = db.getSiblingDB(DB_NAME);
d.shellthings.insertMany([...Array(7).keys()].map((i) => ({ _id: i, k: i % 2 })));
print(JSON.stringify(["count", d.shellthings.countDocuments({})]));
print(JSON.stringify(["cursor", d.shellthings.find().sort({ _id: 1 }).batchSize(2).toArray()]));
print(JSON.stringify(["update", d.shellthings.updateMany({ k: 1 }, { $set: { odd: true } }).modifiedCount]));
print(JSON.stringify(["delete", d.shellthings.deleteOne({ _id: 6 }).deletedCount]));
print(JSON.stringify(["aggregate", d.shellthings.aggregate([{ $group: { _id: "$k", n: { $sum: 1 } } }, { $sort: { _id: 1 } }]).toArray()]));
try {
  d.shellthings.insertOne({ _id: 1 });
  print(JSON.stringify(["duplicate", null]));
} catch (e) {
  print(JSON.stringify(["duplicate", e.code]));
}
